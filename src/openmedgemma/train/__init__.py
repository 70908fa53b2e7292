"""openmedgemma.train"""
