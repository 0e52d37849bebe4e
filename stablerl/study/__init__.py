"""The study layer: the paper's experiments as files, from definition to verdict, without the trainer.

- definition: a study file (cells of config overrides x seeds, findings) expanded into checked run configs;
- run: executing a study's runs as processes (stablerl.executor), then its report;
- summary: one run's status, collapse verdict and summary, from its directory alone;
- verdicts: statistics per cell and the verdict rules for the findings F1-F5, with the cells each rule reads;
- leadtime: which logged signal warns of collapse, how early, at what false-alarm rate;
- report: the Markdown report and its plots from run directories.
"""
