"""The engine service: websocket server, GPU worker with batching, job executor, training hook."""
