"""openmedgemma.serve"""
