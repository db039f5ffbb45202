"""The stack: the fold models' TTA logits combined, the prediction set and combiner chosen, the stack folder.

  combine.py  the sets' features per member, the combiners (mean, rank, LightGBM), leave-one-center-out scores
  rules.py    the choice rules (a registry of small classes): which prediction set goes to the test center
  choice.py   the stack stage's decision (`decide`, a typed `Decision`): a rule's pick, prior matching, the scores
  folder.py   the stack folder's layout and its decision record (`StackChoice`, the one reader and writer)

Nothing is imported here: folder.py sits with the plumbing (the data layer's pseudo-labels read the stack folder),
the rest above the runs.
"""
