"""Suite-wide fixtures. Component fixtures live in the conftest next to their tests."""
