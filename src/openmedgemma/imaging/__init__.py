"""openmedgemma.imaging"""
