"""Rank grid (state.py), expert placement (experts.py, pure Python: the coordinator imports it) and
communicators (comm.py; backends gloo, MPI, NCCL in their own modules, imported only when chosen).
Import from the submodules: this package imports nothing, so the coordinator never loads torch here."""
