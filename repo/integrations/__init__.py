"""RE-PO inside other training libraries.

* :mod:`repo.integrations.trl` - ``REDPOTrainer`` and ``RECPOTrainer``: TRL's
  ``DPOTrainer`` and ``CPOTrainer`` (SimPO included) with re-po's E-step and annotator
  M-step. TRL is an optional extra (``pip install 're-po[trl]'``); this package imports
  nothing from it until that module is imported.
"""
