"""The demo wing: the procedural shapes world and the quality evaluation of its model.

    shapes       the world of coloured shapes the embedded default model
                 (``cm3rt/assets/default``) was trained on: scenes, renderer, captions and
                 an analyzer that reads a rendered image back into objects
    evaluation   the quality evaluation of that model (prompt sets, metrics,
                 ``run_quality``), behind ``cm3rt eval`` and ``bench/quality.py``

It needs the optional extra: ``pip install -e ".[eval]"`` (scipy, for the analyzer).
The runtime never imports it: ``cm3rt generate``, ``cm3rt.generate`` and the engine work
without this package or scipy; only ``cm3rt eval`` (``cm3rt/cli/eval.py``), the training
scripts in ``tools/train`` and the demo tests do.
"""
