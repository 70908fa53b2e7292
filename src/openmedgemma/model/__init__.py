"""openmedgemma.model"""
