"""What a run shows and writes: `console` (the driver's tables and lines), `report` (report.md, plots, TensorBoard),
`summary` (summary.json), `profile` (where the time went) and `progress` (the progress bars the stages draw)."""
