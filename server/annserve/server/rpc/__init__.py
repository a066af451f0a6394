"""gRPC and the process: servicer, server factory, security, metrics, logs, probe, CLI."""
