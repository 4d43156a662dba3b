"""Evaluation in the field's harness (lmms-eval): the ``mmscene`` lmms-eval model, ``mmscene eval``
and the in-training benchmark callback. See docs/evaluation.md.

- :mod:`~mmscene.eval.session`: requests -> the training prompts, pixels and encoder.
- :mod:`~mmscene.eval.loading`: training checkpoints and model directories -> a session.
- :mod:`~mmscene.eval.lmms_model`: the lmms-eval model class (imports lmms-eval).
- :mod:`~mmscene.eval.manifest`: its ``lmms_eval.models`` entry point.
- :mod:`~mmscene.eval.harness`: running lmms-eval tasks and reading their scores.
- :mod:`~mmscene.eval.cli`: ``mmscene eval``; :mod:`~mmscene.eval.callback`: the fit callback.

lmms-eval is optional (``pip install mmscene[eval]``); only the modules that run it import it.
"""
