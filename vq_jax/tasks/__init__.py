"""One module per kind of model the trainer trains; each `make_task(config, workdir, mesh)`
returns the `loop.Task` (state, step, data, evaluation) that `loop.run` drives."""
