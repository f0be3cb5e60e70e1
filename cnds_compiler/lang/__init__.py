"""The language stage: a parsed spec (AST) → the IR graph.

``merge`` resolves ``extends``; ``values`` evaluates expressions and binds arguments (one binder for ops,
blocks and policies); ``ops`` and ``settings`` turn bound values into typed attributes and configs;
``lower`` builds the graph of nodes and heads.
"""
