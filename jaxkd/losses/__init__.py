"""Knowledge-distillation losses as pure JAX functions (jax, numpy and optax only).

Every loss computes in float32 internally, states its formula, paper and the reference
implementation whose convention it reproduces; see docs/losses.md for the table.
"""
# Each section is owned by one module; keep the imports explicit.

# --- logit losses (logit.py) ---

# --- feature and relation losses (feature.py, relation.py) ---

# --- sequence / LLM losses (sequence.py, chunked.py) ---
