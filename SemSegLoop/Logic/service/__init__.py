"""The engine as a separate process: the line protocol, the service that owns one project, and
the client that starts it and follows its jobs."""
