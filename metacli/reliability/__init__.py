"""What keeps a run safe: verified checkpoints, every RNG's state, the run dir's claim and lock, graceful stops on
signals, the memory check before anything is allocated, and host-memory retention for long runs."""
