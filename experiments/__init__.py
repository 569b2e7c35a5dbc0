"""Experiments that exercise the library end to end (SPT vs standard pretraining, the storage law).

They import mixer_service, client and trainer; nothing in the library imports them. Run them from the
repository root: `python -m experiments.spt`, `python -m experiments.storage`.
"""
