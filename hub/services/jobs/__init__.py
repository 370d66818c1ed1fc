"""Batch jobs on the hub (docs/API.md, Jobs and Artifacts): ``core`` submits, reads and cancels them,
``queue`` starts pending ones on controllers, ``watch`` follows the attempts and settles them, ``artifacts``
keeps their inputs and outputs."""
