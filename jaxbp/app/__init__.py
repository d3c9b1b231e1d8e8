"""The experiment app that the `jaxbp` command runs, built on the library floor.

config (typed, validated once) -> model (built from the registry) -> experiment (model and
data, shared by train, eval, check and the benchmark) -> steps (jitted) -> train (the epoch
loop) -> rundir, checkpoint, report (what a run leaves in its folder) -> cli. Nothing in
`jaxbp.layers`, `jaxbp.nn` or `jaxbp.registry` imports this package.
"""
