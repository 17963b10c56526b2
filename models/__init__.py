"""The ppinfer model zoo: programs with known answers, and the embedded default language model."""
