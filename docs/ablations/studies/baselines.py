[Variant("pop", row="pop"), Variant("rkmf", row="rkmf"), Variant("spmf", row="spmf"), Variant("mf_ft", row="mf_ft"), Variant("srec", row="srec")]
