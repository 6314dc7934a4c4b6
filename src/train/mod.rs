//! L2: fine-tuning with Candle. Runs only inside `jobd worker`, never in the daemon process.
