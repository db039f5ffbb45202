"""steploop.StepLoop, the one resumable loop of the engine, the stain GAN and robustify: a killed loop resumes to the
records of an uninterrupted one, a non-finite loss stops it in one line, states of the earlier layouts resume."""
from __future__ import annotations

import json
import re

import pytest
from accelerate import Accelerator

from histoshift import checkpoint
from histoshift.errors import NonFiniteError
from histoshift.steploop import Evaluated, StepLoop


def _loop(folder, total=6, **kw) -> StepLoop:
    kw = {"checkpoint_every": 2, "record_every": 2, **kw}
    folder.mkdir(parents=True, exist_ok=True)  # (the callers' folders exist: a run folder, exclusive_folder)
    return StepLoop(Accelerator(cpu=True), folder, "state-step", total, "step", "toy", "lower the lr", "start over",
                    0, **kw)


class _Counter:
    """A 'model' whose loss is a function of the step and of its own state (which must be restored on resume)."""

    def __init__(self):
        self.value = 0.0

    def step(self, u: int) -> dict[str, float]:
        self.value += u + 1
        return {"loss": self.value / 10, "other": float(u)}

    def state(self):
        return {"value": self.value}, {}

    def restore(self, extra, folder):
        self.value = extra["value"]


def test_a_killed_loop_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = _loop(tmp_path / "whole").run(_Counter().step)
    assert [r["step"] for r in whole.records] == [2, 4, 6] and whole.done == 6
    assert whole.records[0]["loss"] == round((0.1 + 0.3) / 2, 5) and whole.records[0]["other"] == 0.5
    # the newest state only (older ones removed as each is saved), none after the last unit: the caller's finish
    # replaces it
    assert [p.name for p in (tmp_path / "whole").glob("state-step*")] == ["state-step4"]

    real = checkpoint.save_state

    def die_after_the_second(*a, **k):
        real(*a, **k)
        if a[1].name == "state-step4":
            raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_state", die_after_the_second)
    first = _Counter()
    with pytest.raises(KeyboardInterrupt):
        _loop(tmp_path / "cut").run(first.step, state=first.state, restore=first.restore)
    monkeypatch.setattr(checkpoint, "save_state", real)
    again = _Counter()  # a new process: its state comes from the saved one
    seen = []
    resumed = _loop(tmp_path / "cut").run(again.step, state=again.state, restore=again.restore,
                                          on_resume=lambda t: seen.append(t.done))
    assert seen == [4] and again.value == 21.0
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in whole.records]


def test_a_non_finite_loss_stops_the_loop_in_one_line_naming_its_folder(tmp_path):
    with pytest.raises(NonFiniteError, match=re.escape(f"{tmp_path}: the loss became non-finite in step 3 (loss nan); "
                                                       "lower the lr")):
        _loop(tmp_path).run(lambda u: {"loss": float("nan") if u == 2 else 1.0})


def test_a_state_the_caller_cannot_restore_is_one_line(tmp_path):
    counter = _Counter()
    _loop(tmp_path / "cut", total=4).run(counter.step, state=lambda: ({}, {}))  # saved without the caller's "value"
    line = r"loop.json: not a saved loop state \(KeyError: 'value'\); start over"
    with pytest.raises(checkpoint.StaleError, match=line):
        _loop(tmp_path / "cut", total=4).run(_Counter().step, restore=_Counter().restore)


def test_evaluate_adds_to_the_record_and_stops_early(tmp_path):
    calls = []

    def evaluate(u, losses):
        calls.append(u)
        return Evaluated({"score": u * 10}, stop=u == 2)
    out = _loop(tmp_path, record_every=1).run(lambda u: {"loss": 1.0}, evaluate=evaluate)
    assert calls == [0, 1, 2] and out.stopped and out.done == 3 and [r["score"] for r in out.records] == [0, 10, 20]
    assert not list(tmp_path.glob("state-step3"))  # a stopped loop saves no state for its last unit


@pytest.mark.parametrize("layout", ["engine", "steps"])
def test_states_of_the_earlier_layouts_resume(tmp_path, layout):
    _loop(tmp_path, total=4).run(_Counter().step)  # nothing saved at the end; write a state by hand, as before
    acc = Accelerator(cpu=True)
    records = [{"step": 2, "seconds": 1.0, "loss": 0.2}]
    old = ({"progress": {"epoch": 2, "step": 40, "seconds": 1.0, "records": records, "best_epoch": 1,
                         "best_acc": 0.5}, "value": 3.0} if layout == "engine"
           else {"step": 2, "seconds": 1.0, "records": records, "value": 3.0})
    (tmp_path / "old").mkdir()
    checkpoint.save_state(acc, tmp_path / "old" / "state-step2", old, 0, "a state")
    counter = _Counter()
    extra = {}
    loop = _loop(tmp_path / "old", total=4)
    out = loop.run(counter.step, restore=lambda e, f: extra.update(e) or counter.restore(e, f))
    assert out.records[0] == records[0] and [r["step"] for r in out.records] == [2, 4] and counter.value == 3.0 + 3 + 4
    if layout == "engine":
        assert extra["step"] == 40 and extra["best_epoch"] == 1 and extra["best_acc"] == 0.5
    state = json.loads((tmp_path / "old" / "state-step2" / checkpoint.LOOP_STATE).read_text())
    assert state == old  # read, never rewritten
