"""The artifact store: keys, records and markers, a local folder or S3."""
