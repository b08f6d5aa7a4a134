"""invariantd.client: the Python client and the `invariantctl` CLI."""
