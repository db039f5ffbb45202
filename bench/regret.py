"""Regret of the stack's choice rules, and the shift penalty, on the accuracy benchmark's trained ensembles.

    python bench/regret.py [--work work/bench_accuracy] [--seeds 0 1 2] [--noshift [SEED ...]] [--tag NAME]
                           [--sets NAME=CONFIG[,CONFIG] ...]  (other trained sets, e.g. lntl=dart_lntl_lite0)
    python bench/regret.py --summary-of bench/results/regret-<date>-<tag>     (the summary of saved files again)
    python bench/regret.py --merge PREFIX PREFIX... --tag NAME                 (several runs' cases as one set)
    python bench/regret.py --pair PREFIX SET PREFIX SET --tag NAME             (two sets of two runs, paired)

Trains nothing: it re-stacks the runs that
`python bench/accuracy.py --rows none --ensemble --frozen-ensemble --mixed --configs configs/lite0_dann.yaml
--epochs 3 --seeds S` trained and predicted (real PCam tissue, SYNTHETIC pseudo-center stain shifts). A case is
one unseen center x one seed x one set: `fine-tuned` (Lite0 DANN x 4 folds), `frozen` (heads on frozen ImageNet
Lite0 features x 4 folds), `mixed` (all 8 through one stack). The unseen centers:

- center 2, the test center the runs were trained beside (its unlabelled patches fed DANN's domain head, as the
  shipped pipeline does);
- the hidden center: the same test patches re-stained with accuracy.HIDDEN_CENTER, predicted by the same models
  (plain, and adapted to those patches). Unlike `accuracy.py --hidden`, which trains everything again with the
  hidden patches as the unlabelled target, no model saw these patches in any form: a hospital that arrives after
  training. (Two CPU cores train one seed's ensembles in about 50 minutes; this halves that.)

Per case: every candidate the stack compared (combiner x prediction set, plain and prior-matched) with its
accuracy on the unseen center; every rule's pick (stack/rules.py, through stack.choice.decide as the stack stage
ships it; the unsupervised rules read that center's patches) and its **regret** = the best candidate there minus
the shipped one. With --noshift: the same test patches at training center 0's stain (make_competition_h5.CENTERS[0]),
predicted by the same models, plain and adapted, give every candidate's no-shift accuracy and the **shift
penalty** of what each rule shipped (no-shift minus shifted: same models, same patches, same stackers).
Predictions on other stains load each model straight from its run folder against a second cache
(`<work>_hidden_patches`, `<work>_noshift`): the run's lineage check is bypassed on purpose, predicting other
patches with the same model being the point; they are saved there and reused.

Writes bench/results/regret-<date>-<tag>-{candidates,rules}.csv (one row per case x candidate / rule) and
-patches.csv.gz (per patch and case: the label and every rule's and candidate's 0/1 prediction, for paired
comparisons), then prints the summary: each rule's mean and worst regret, and paired differences pooled over
seeds and both unseen centers (paired.py; the same patch under several seeds and centers is one cluster).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

import accuracy as bench  # bench/accuracy.py: its data builders and the package on sys.path
from histoshift.stack.choice import compare_prediction_sets, decide
from histoshift.data.cache import Cache
from histoshift.paired import compare
from histoshift.stack.rules import RULES
from histoshift.runs import find_runs
from histoshift.stack.combine import disagreement, fit_stacker, join_sets, predict
from histoshift.stack.sets import ADAPTED, BOTH, PLAIN, Label

META = ("id", "label", "center", "seed", "set")  # the per-patch frame's columns that are not predictions
SETS = {"fine-tuned": ("lite0_dann",), "frozen": ("lite0_dann_frozen",), "mixed": ("lite0_dann", "lite0_dann_frozen")}


def candidate_predictions(features: dict, comparison: pd.DataFrame) -> dict:
    """Label -> 0/1 predictions on the test center of every candidate in `comparison` (its prior-matched variants
    thresholded to half positive), from `features` (PredictionSet -> (oof, test, names); stackers fitted on oof)."""
    out, stackers = {}, {}
    for label in comparison["label"].unique():
        oof, test, names = features[label.pset]
        if label.combiner == "stack" and label.pset not in stackers:
            stackers[label.pset] = fit_stacker(oof, names)
        _, pred = predict(label.combiner, test, names, stackers.get(label.pset), 0.5 if label.prior else None)
        out[label] = pd.Series(pred, index=test["id"].to_numpy())
    return out


def other_stain_tables(run, cache: Cache, paths, store: Path, accelerator) -> dict[bool, pd.DataFrame]:
    """The run's model on the test patches of another root (`cache`): 8-view logits, plain (False) and adapted to
    those patches (True). Saved under `store` and reused (resumable)."""
    from histoshift.data.splits import test_rows, training_rows
    from histoshift.precision import config_precision
    from histoshift.tasks import task_class

    from histoshift.lineage import digest_file

    files = {adapted: store / run.name / f"tta_test{'_adapted' if adapted else ''}.csv" for adapted in (False, True)}
    stamp, digest = store / run.name / "checkpoint.digest", digest_file(run.checkpoint)
    if not (stamp.exists() and stamp.read_text() == digest and all(f.exists() for f in files.values())):
        task = task_class(run.kind)(run.cfg, cache, paths, accelerator, config_precision(run.cfg))
        model, table = task.load(run), test_rows(cache.index)
        predict_views = task.predictor(table, desc=f"{run.name} {store.parent.name}")
        adapted, _ = task.adapt(model, table, training_rows(cache.index, run.fold))
        for flag, m in ((False, model), (True, adapted)):
            files[flag].parent.mkdir(parents=True, exist_ok=True)
            predict_views(m).to_csv(files[flag], index=False)
        stamp.write_text(digest)  # last: the files are from this checkpoint
    return {flag: pd.read_csv(f) for flag, f in files.items()}


def test_features(tables: dict[str, list[pd.DataFrame]]) -> pd.DataFrame:
    """stack.build_features' test rows from per-member lists of fold models' 8-view tables (mean and spread over
    views, averaged over folds; disagreement between folds)."""
    out = None
    for name, parts in sorted(tables.items()):
        parts = [t.sort_values("id").reset_index(drop=True) for t in parts]
        views = [[c for c in t.columns if c.startswith("v")] for t in parts]
        means = np.stack([t[v].to_numpy().mean(1) for t, v in zip(parts, views)])
        spreads = np.stack([t[v].to_numpy().std(1) for t, v in zip(parts, views)])
        if out is None:
            out = parts[0][["id", "center"]].copy()
        out[f"{name}__mean"], out[f"{name}__spread"] = means.mean(0), spreads.mean(0)
        out[f"{name}__disagree"] = disagreement(means > 0)
    return out


class Elsewhere:
    """The same test patches under another stain: a second root (input copied, test.h5 re-stained, its own cache
    and, for heads, its own feature store) and every run's predictions there."""

    def __init__(self, pcam: Path, work: Path, name: str, stain: tuple, what: str, accelerator):
        from histoshift.paths import Paths

        self.root = work.with_name(f"{work.name}_{name}")
        bench.build_restained(pcam, work, self.root, stain, what)
        bench.Bench(self.root, None, []).stage("prepare")
        self.cache, self.paths, self.acc = Cache.open(self.root / "work" / "cache"), Paths(self.root), accelerator

    def features(self, runs: list, features: dict) -> dict:
        """PredictionSet -> (oof, test features here, names) for the plain, adapted and joined sets of `features`."""
        tables = {False: {}, True: {}}
        for run in runs:
            for flag, t in other_stain_tables(run, self.cache, self.paths, self.root / "preds", self.acc).items():
                tables[flag].setdefault(run.model_name, []).append(t)
        out = {PLAIN: (features[PLAIN][0], test_features(tables[False]), features[PLAIN][2])}
        if ADAPTED in features:
            out[ADAPTED] = (features[ADAPTED][0], test_features(tables[True]), features[ADAPTED][2])
            out[BOTH] = join_sets(out[PLAIN], out[ADAPTED])
        return out


def score_case(case: dict, features: dict, comparison: pd.DataFrame, hits: dict, y: np.ndarray,
               noshift: dict | None) -> tuple[list, list, pd.DataFrame]:
    """One case: candidate rows, rule rows and the per-patch frame (see the module docstring)."""
    preds = candidate_predictions(features, comparison)
    ids = next(iter(preds.values())).index
    acc = {k: float((p.to_numpy() == y).mean()) for k, p in preds.items()}
    ns, ns_preds = {}, {}
    if noshift is not None:
        ns_preds = {k: p.loc[ids].to_numpy() for k, p in candidate_predictions(noshift, comparison).items()}
        ns = {k: float((p == y).mean()) for k, p in ns_preds.items()}
    loco, best = comparison.groupby("label", sort=False)["accuracy"].mean(), max(acc.values())
    cands = [{**case, "candidate": str(k), "loco": round(float(loco[k]), 5), "test": round(acc[k], 5),
              "noshift": round(ns.get(k, np.nan), 5)} for k in sorted(acc, key=str)]
    rules, frame = [], pd.DataFrame({"id": ids, "label": y, **case})
    for name in RULES:
        d = decide(features, comparison, hits, prior=0.5, rule=name)
        shipped, right = d.shipped, float((d.pred == y).mean())
        assert abs(right - acc[shipped]) < 1e-9, (shipped, right, acc[shipped])  # decide ships that candidate
        rules.append({**case, "rule": name, "shipped": str(shipped), "test": round(right, 5), "best": round(best, 5),
                      "regret": round(best - right, 5), "noshift": round(ns.get(shipped, np.nan), 5),
                      "shift_penalty": round(ns.get(shipped, np.nan) - right, 5)})
        frame[f"rule:{name}"] = d.pred
        if ns_preds:  # what this rule shipped, on the no-shift patches (the shift penalty, paired)
            frame[f"noshift:{name}"] = ns_preds[shipped]
    for label, p in preds.items():
        frame[str(label)] = p.to_numpy()
    return cands, rules, frame


def main():
    from accelerate import Accelerator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pcam", default=str(bench.REPO.parent / "shared" / "data" / "pcam"))
    ap.add_argument("--work", default=str(bench.REPO / "work" / "bench_accuracy"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noshift", type=int, nargs="*", default=None, metavar="SEED",
                    help="also predict the no-shift patches (for the seeds given; none given: every seed)")
    ap.add_argument("--tag", default="lite0")
    ap.add_argument("--sets", nargs="+", metavar="NAME=CONFIG[,CONFIG]",
                    help="the sets to re-stack instead of fine-tuned, frozen and mixed (config names as trained, e.g. "
                         "fine-tuned=lite0_dann lntl=dart_lntl_lite0); each set other than fine-tuned and frozen is "
                         "compared with fine-tuned, paired")
    ap.add_argument("--out", default=str(bench.REPO / "bench" / "results"))
    ap.add_argument("--merge", nargs="+", metavar="PREFIX",
                    help="merge the cases of these runs' files (a case in several: the first file's, the others "
                         "compared to it) into <out>/regret-<date>-<tag>-*, then write their summary")
    ap.add_argument("--pair", nargs=4, metavar=("PREFIX_A", "SET_A", "PREFIX_B", "SET_B"),
                    help="set A of one run's files against set B of another's, on the patches and seeds both have, "
                         "paired: writes <out>/regret-<date>-<tag>-pair.txt")
    ap.add_argument("--summary-of", metavar="PREFIX",
                    help="only write the summary of the files PREFIX-rules.csv and PREFIX-patches.csv.gz again")
    a = ap.parse_args()
    if a.pair:
        text = pair(*a.pair)
        Path(a.out, f"regret-{time.strftime('%Y-%m-%d')}-{a.tag}-pair.txt").write_text(text + "\n")
        print(text)
        return
    if a.merge:
        base = Path(a.out) / f"regret-{time.strftime('%Y-%m-%d')}-{a.tag}"
        print(merge(a.merge, base))
        a.summary_of = str(base)
    if a.summary_of:
        text = summary(*renamed(pd.read_csv(f"{a.summary_of}-rules.csv"),
                                pd.read_csv(f"{a.summary_of}-patches.csv.gz")))
        Path(f"{a.summary_of}-summary.txt").write_text(text + "\n")
        print(text)
        return
    work, pcam, acc = Path(a.work), Path(a.pcam), Accelerator()
    sets = dict((n, tuple(c.split(","))) for n, _, c in (x.partition("=") for x in a.sets)) if a.sets else SETS
    noshift_seeds = None if a.noshift is None else set(a.noshift or a.seeds)
    hidden = Elsewhere(pcam, work, "hidden_patches", bench.HIDDEN_CENTER, "hidden center (prediction only)", acc)
    noshift = Elsewhere(pcam, work, "noshift", bench.make_script(pcam).CENTERS[0],
                        "no shift (training center 0's stain)", acc) if noshift_seeds else None
    labels = pd.read_csv(work / "input" / "test_labels.csv").set_index("ID")["label"]
    cache, all_runs = Cache.open(work / "work" / "cache"), find_runs(work / "work" / "runs")
    cand_rows, rule_rows, patches, t0 = [], [], [], time.time()
    for seed in a.seeds:
        for set_name, configs in sets.items():
            runs = [r for r in all_runs if r.model_name in {f"{c}/seed{seed}" for c in configs}]
            if len(runs) != 4 * len(configs) or not all(r.tta.fresh(cache.id, ADAPTED) for r in runs):
                print(f"skip: seed {seed}, {set_name}: not trained and predicted")
                continue
            features, comparison, hits = compare_prediction_sets(runs, work / "folds" / "folds.csv", cache, prior=0.5)
            if set(features) - {PLAIN, ADAPTED, BOTH}:
                raise SystemExit("Fourier sets present: this benchmark compares plain, adapted and both")
            ns = noshift.features(runs, features) if noshift and seed in noshift_seeds else None
            for center, feats in (("center 2", features), ("hidden", hidden.features(runs, features))):
                case = {"center": center, "seed": seed, "set": set_name}
                y = labels.loc[feats[PLAIN][1]["id"]].to_numpy()
                cands, rules, frame = score_case(case, feats, comparison, hits, y, ns)
                cand_rows += cands
                rule_rows += rules
                patches.append(frame)
                print(f"{center}, seed {seed}, {set_name}: best {rules[0]['best']:.4f}; "
                      + ", ".join(f"{r['rule']} {r['test']:.4f}" for r in rules) + f" [{time.time() - t0:.0f} s]",
                      flush=True)
    if not rule_rows:
        raise SystemExit("no trained case found: run bench/accuracy.py first (see this script's help)")
    out, stamp = Path(a.out), time.strftime("%Y-%m-%d")
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"regret-{stamp}-{a.tag}"
    pd.DataFrame(cand_rows).to_csv(f"{base}-candidates.csv", index=False)
    pd.DataFrame(rule_rows).to_csv(f"{base}-rules.csv", index=False)
    pd.concat(patches, ignore_index=True).to_csv(f"{base}-patches.csv.gz", index=False)
    text = summary(pd.DataFrame(rule_rows), pd.concat(patches, ignore_index=True))
    Path(f"{base}-summary.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {base}-{{candidates,rules}}.csv, {base}-patches.csv.gz, {base}-summary.txt")


def as_now(text):
    """Files written before 2026-12-07 name the adapted set '+adabn' (after the first adaptation): as now, '+adapt'."""
    return text.replace("+adabn", "+adapt") if isinstance(text, str) else text


def renamed(rules: pd.DataFrame, patches: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A run's rules and patches with today's labels (`as_now`)."""
    return rules.assign(shipped=rules["shipped"].map(as_now)), patches.rename(columns=as_now)


def pair(prefix_a: str, set_a: str, prefix_b: str, set_b: str) -> str:
    """Set A of one run against set B of another, on the (center, seed, patch) both have: what each rule shipped and
    the plain / adapted mean combiners, per unseen center and pooled (paired.py; clusters: patch ids)."""
    keys = ["center", "seed", "id"]
    a, b = (pd.read_csv(f"{p}-patches.csv.gz").rename(columns=as_now) for p in (prefix_a, prefix_b))
    a, b = a[a["set"] == set_a].set_index(keys), b[b["set"] == set_b].set_index(keys)
    both = a.index.intersection(b.index)
    a, b = a.loc[both], b.loc[both]
    if not len(both) or not (a["label"] == b["label"]).all():
        raise SystemExit("the two sets share no patches, or their labels differ")
    out = [f"{set_a} ({prefix_a}) - {set_b} ({prefix_b}): seeds {sorted(set(both.get_level_values('seed')))}, "
           f"{len(both)} patch predictions each"]
    for col in [c for c in a.columns if c.startswith("rule:")] + ["mean", "mean+adapt"]:
        for center in [*sorted(set(both.get_level_values("center"))), None]:
            m = (both.get_level_values("center") == center) if center else slice(None)
            p = compare((a[col] == a["label"]).to_numpy()[m], (b[col] == b["label"]).to_numpy()[m],
                        both.get_level_values("id")[m])
            out.append(f"  {col:<16} {center or 'both centers':<12} {p.text()}")
    return "\n".join(out)


def merge(prefixes: list[str], out: Path) -> str:
    """The cases of several runs' files as one set (labels as now, `renamed`): a case (center, seed, set) in more than
    one file is taken from the first, and the later files' rules for it are compared to it (a seed run twice, e.g. the
    frozen heads trained again, must give the same picks and accuracies)."""
    key, frames, notes = ["center", "seed", "set"], {"candidates": [], "rules": [], "patches": []}, []
    seen = None
    for prefix in prefixes:
        rules, patches = renamed(pd.read_csv(f"{prefix}-rules.csv"), pd.read_csv(f"{prefix}-patches.csv.gz"))
        cands = pd.read_csv(f"{prefix}-candidates.csv")
        cands["candidate"] = cands["candidate"].map(as_now)
        cases = rules[key].drop_duplicates()
        if seen is not None:
            both = cases.merge(seen, on=key)
            if len(both):
                first = pd.concat(frames["rules"]).merge(both, on=key).set_index([*key, "rule"])
                again = rules.merge(both, on=key).set_index([*key, "rule"]).loc[first.index]
                notes.append(f"{prefix}: {len(both)} case(s) already merged: max |accuracy difference| "
                             f"{(first['test'] - again['test']).abs().max():.5f}, same picks: "
                             f"{bool((first['shipped'] == again['shipped']).all())}")
            new = cases.merge(seen, on=key, how="left", indicator=True)
            cases = new[new["_merge"] == "left_only"][key]
        for name, frame in (("candidates", cands), ("rules", rules), ("patches", patches)):
            frames[name].append(frame.merge(cases, on=key))
        seen = cases if seen is None else pd.concat([seen, cases])
    for name, parts in frames.items():
        suffix = "patches.csv.gz" if name == "patches" else f"{name}.csv"
        pd.concat(parts, ignore_index=True).to_csv(f"{out}-{suffix}", index=False)
    return "\n".join(notes + [f"merged {len(seen)} cases into {out}-*"])


def summary(rules: pd.DataFrame, patches: pd.DataFrame, against: str = "loco") -> str:
    """Per rule: cases, mean and worst regret, its shipped predictions against `against`'s (paired over every case's
    patches; clusters: patch ids); per set and center, the rules' regret; the shift penalty of what each rule
    shipped (paired: the same patches without and with the shift); mixed against fine-tuned under each rule."""
    def hits(frame: pd.DataFrame, col: str) -> np.ndarray:
        return (frame[col] == frame["label"]).to_numpy()

    seeds = rules.groupby("set")["seed"].apply(lambda x: sorted(set(x)))
    out = [
        f"cases: {len(rules.groupby(['center', 'seed', 'set']))} "
        f"({', '.join(f'{k}: seeds {v}' for k, v in seeds.items())}), "
        f"centers {sorted(rules['center'].unique())}; points = 0.01 accuracy",
        "",
        f"rule        cases  mean regret  worst  regret decisive*  shipped - {against}'s, pooled paired (95% CI)",
    ]
    cases = {key: part for key, part in patches.groupby(["center", "seed", "set"], sort=False)}
    for name, part in rules.groupby("rule", sort=False):
        p = compare(hits(patches, f"rule:{name}"), hits(patches, f"rule:{against}"), patches["id"])
        decisive = 0
        for _, row in part.iterrows():  # the best candidate against what shipped, on that case's patches
            frame = cases[(row["center"], row["seed"], row["set"])]
            best = max((c for c in frame.columns if c not in META and not c.startswith(("rule:", "noshift:"))),
                       key=lambda c: hits(frame, c).mean())
            decisive += compare(hits(frame, best), hits(frame, f"rule:{name}")).decisive
        out.append(
            f"{name:<11} {len(part):>5}  {100 * part['regret'].mean():>11.2f}  {100 * part['regret'].max():>5.2f}"
            f"  {decisive:>6} of {len(part):<8} {p.text()}"
        )
    out.append("* cases where the best candidate beats what shipped decisively (paired 95% interval above 0)")
    out += ["", "regret per set and center (points, mean over seeds):",
            (100 * rules.pivot_table(index=["set", "center"], columns="rule", values="regret", sort=False)).round(2)
            .to_string()]
    if any(c.startswith("noshift:") for c in patches.columns):
        out += [
            "",
            "shift penalty of what each rule shipped: no-shift minus shifted, same models and patches, pooled paired:",
        ]
        for name in rules["rule"].unique():
            for key, part in patches.dropna(subset=[f"noshift:{name}"]).groupby(["set", "center"], sort=False):
                p = compare(hits(part, f"noshift:{name}"), hits(part, f"rule:{name}"), part["id"])
                out.append(
                    f"  {name:<10} {key[0]:<10} {key[1]:<8} {100 * p.acc_b:.1f} -> {100 * p.acc_a:.1f} without the "
                    f"shift: {p.text()}"
                )
    out += ["", "candidates against each other, pooled paired (every case; per center):"]
    adapted = Label("mean", ADAPTED)
    for a, b in ((adapted, Label("mean")), (Label("stack", ADAPTED), adapted), (Label("rank", BOTH), adapted),
                 (adapted.matched(), adapted), (Label("mean").matched(), Label("mean"))):
        a, b = str(a), str(b)
        if a in patches and b in patches:
            parts = [("all", patches), *patches.groupby("center", sort=False)]
            out += [f"  {a} - {b}, {key}: {compare(hits(f, a), hits(f, b), f['id']).text()}" for key, f in parts]
    keys = ["center", "seed", "id"]
    others = [s for s in patches["set"].unique() if s not in ("fine-tuned", "frozen")]  # e.g. mixed, a --sets one
    for other in others:
        for name in rules["rule"].unique():
            them = patches[patches["set"] == other].set_index(keys)
            tuned = patches[patches["set"] == "fine-tuned"].set_index(keys)
            both = them.index.intersection(tuned.index)
            if len(both):
                m, t = them.loc[both], tuned.loc[both]
                p = compare(hits(m, f"rule:{name}"), hits(t, f"rule:{name}"), both.get_level_values("id"))
                out.append(f"{other} - fine-tuned set, rule {name}: {p.text()}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
