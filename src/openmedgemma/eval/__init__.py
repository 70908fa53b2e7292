"""openmedgemma.eval"""
