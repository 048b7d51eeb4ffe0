"""The method: what a researcher changes (never imports boto3, pandas, prefect or ray)."""
