"""HTTP serving: the API and web page (app.py), dynamic batching (batching.py), the models (models.py)."""
