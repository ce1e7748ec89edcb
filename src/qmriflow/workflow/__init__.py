"""Running the workflow: the demo, plain and nightly runs (:mod:`.runner`,
:mod:`.nightly`), failure records and provenance of the derivatives."""
