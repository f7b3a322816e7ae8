"""The torch-free contract between bot and engine: protocol, config, errors, transport (the bot may import it)."""
