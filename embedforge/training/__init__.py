"""The training machinery every embedforge training stage shares.

- :mod:`.guard`: the NaN / signal guard, checkpoint records and resume (``guarded_train``, ``resume_point``).
- :mod:`.precision`: the ``precision`` option (:class:`~.precision.Precision`) and how it resolves (``use_bf16``).
- :mod:`.memory`: releasing finished models' memory and measuring peak host / GPU memory.

Nothing is imported here, so a torch-free config can import :mod:`.precision` without pulling in transformers.
"""
