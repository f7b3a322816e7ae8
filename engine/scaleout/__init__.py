"""Scale-out over Redis: the bot's dispatcher, its leases and policy (torch-free), and the engine-side worker."""
