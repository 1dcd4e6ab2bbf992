"""The stages of the suite and the only code that reads the Hydra config (``run.py`` orders the stages).

Each stage module takes a typed :class:`pipeline.config.RunConfig`, checks that what it needs from the
stage before it exists (never runs that stage itself), and writes its folder through
``datamodules.artifacts``. Heavy libraries (torch, Lightning, transformers) are imported inside the
stages, so that ``python run.py --help`` answers in about a second.
"""
