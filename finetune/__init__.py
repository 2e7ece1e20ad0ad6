"""Stage 2: fine-tune the collaborative tower on labels (`finetune.module.CTRModule`), export it and
serve it (`finetune.export`). Nothing is imported here, so serving never loads Lightning."""
