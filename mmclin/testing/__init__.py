"""The conformance checks every registered encoder, fusion head and task passes (public: use them on your own components)."""
