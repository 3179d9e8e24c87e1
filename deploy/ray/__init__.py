"""peftserve on Ray Serve: an OpenAI-compatible ingress in front of N whole peftserve engines.

Each replica is a full server (``server.api.app.create_app``) holding many adapters and batching
them together; the ingress sends a request to a replica that already holds its adapter through
Ray Serve's model multiplexing, with the adapter name as the model id. Run it with
``python -m deploy.ray``.
"""
