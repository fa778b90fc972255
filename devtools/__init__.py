"""Developer tooling that runs outside the product (test prerequisites)."""
