"""Many students from one cache (`kdcache sweep`; in Python `kdcache.sweep`, the function in kdcache.sweeps.run): an
Optuna study whose trials are ordinary `train_student` runs. run.py runs the study, space.py reads its space,
study.py opens its storage, report.py writes what it leaves. The package is named sweeps, not sweep, so that
`kdcache.sweep` stays the function: importing a subpackage binds its name on the package above it."""
