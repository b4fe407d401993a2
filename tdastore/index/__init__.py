"""FAISS indexes over operator-transformed gradient rows."""
