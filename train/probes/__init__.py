"""Probes: analysis tools run by hand on finished CV folds or on the teacher, no part of training.

``python -m train.probes.speaker_centring`` (would a per-speaker running mean help the student?),
``python -m train.probes.teacher_gap`` (how closely the students follow their teacher) and
:mod:`train.probes.teacher_channels` (the teacher through telephone channels:
``python -m train teacher --channels``); EXPERIMENTS.md has their notes.
"""
