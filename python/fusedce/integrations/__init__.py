"""Adapters that put fusedce into other libraries' models. Each one is imported on its own
(`fusedce.integrations.transformers`), so `import fusedce` never imports those libraries, and each
calls fusedce's public API only."""
