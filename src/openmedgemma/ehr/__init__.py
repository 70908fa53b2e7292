"""openmedgemma.ehr"""
