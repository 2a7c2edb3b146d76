"""The language: text -> typed IR, without torch.

- `parser`  Lark grammar (grammar/fuse.lark) -> AST with spans (`ast`)
- `checker` names, imports, types, signatures, constant argument values -> `ir.Program`
  (`signatures`: the builtins' and ops' parameter tables; `values`: value checks)
- `fmt`     the canonical formatter
- `diagnostics` located errors and their rendering
"""
