"""Method-specific loss terms, batch preparers and eval functions.

Every module in this package is imported by `jaxlab.objectives` before a
config's terms are looked up, so a module here only needs to call
`objectives.register_term / register_preparer / register_eval`.
"""
