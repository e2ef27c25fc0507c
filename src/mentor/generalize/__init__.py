"""Domain generalisation (``mentor.generalize``): train on labelled source domains, test on held-out ones.

Methods declare ``Inputs(domains=True)``: the engine draws ``batch_size`` images from each training
domain per step, with ``batch["domain"]``; runs name their held-out domains with ``data.test_domains``
and report each, their mean and the worst, while selecting on the training domains' holdout split.
"""
