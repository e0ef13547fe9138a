"""The sweep harness: config (`config`), steps and presets (`steps`), plan -> execute -> record (`plan`, `execute`,
`record`), on Ray (`distributed`), the driver (`run`), the results-folder schema (`results`), and one row rebuilt
outside a sweep (`prepare`)."""
