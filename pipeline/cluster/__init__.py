"""Where the pools run: `pools` (connecting to Ray, the driver's pools), `reservations` and `placement` (what pools
hold and whether every phase fits), `colocate`, `weight_sync`, and `plan` (the memory and placement plan,
`python -m pipeline.cluster.plan`)."""
