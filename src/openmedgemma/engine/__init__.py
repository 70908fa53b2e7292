"""openmedgemma.engine"""
