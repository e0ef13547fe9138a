"""The sweep harness: config (`config`), steps and presets (`steps`), plan -> execute -> record (`plan`, `execute`,
`record`), on Ray (`distributed`), the driver (`run`), the results-folder schema (`results`), one row rebuilt
outside a sweep (`prepare`), and one row's per-layer sensitivity outside a sweep (`sensitivity`; a sweep measures
the rows of its [sensitivity] table itself)."""
