"""Users' folders on storage volumes: the model, the service, the file API."""
