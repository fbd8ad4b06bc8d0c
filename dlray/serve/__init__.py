"""Ray Serve applications over exported artifacts. See dlray.serve.app."""
